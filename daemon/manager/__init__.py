"""The model manager: which engines run, where, and for how long.

Where each piece lives:

- `core.Manager`: the one owner of model state (`Manager.instances`). Lookups, `acquire` and
  `release`, `ensure_ready`, reload, background jobs, unload/replace/stop_all, stopping an
  engine and clearing its claim, and the idle reaper.
- `state`: what is kept per model (`Instance`, `State`, `Load`, `Job`) and small rules that
  need no manager (retry backoff, out-of-memory detection, log paths).
- `admission`: each model's `Gate`: the slots requests take (`[policy] max_concurrency`), the
  queue they wait in (`max_queue`), and the holds a waiting load puts on busy models so that a
  swap is not put off forever. Pure; `acquire`, `release` and the load path drive it.
- `loading.Loader`: the load path: plan, reserve a placement, make room (evict or park), fetch
  the model, start the engine, plan again after running out of memory, abandon a failed load.
- `parking.Parking`: sleep mode: whether a model can be parked, putting it to sleep, waking it.
- `supervision.Supervision`: the exit watch and health probe of ready engines, and restarts
  with backoff after a crash; `hang`: when unanswered probes make an engine hung rather than
  slow (pure).
- `kv_persist.KvPersist`: prompt caches kept across stops (`[policy] persist_kv`): saved in
  `finish_stop` before the engine is stopped, restored by the load path before the model is
  reported ready.
- `reports`: read-only views (`status`, progress, `plan_preview`, `gpu_report`, log tails).
- `reload`: re-reading the settings and profiles while running; `profile_changes`: whether an
  edited profile needs its engine restarted, or applies in place.

The ownership rule: only the Manager adds instances, and every state change, wherever its code
lives, happens on the event loop with no await between the check and the change it guards
(a placement is claimed, a victim marked stopping or parking, before the first await). So no
locks are needed. `Loader`, `Parking` and `Supervision` each receive the Manager and reach one
another only through it, so none of these modules imports another except the pure `state` and
`admission`.
"""
