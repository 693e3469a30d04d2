"""`llmd install` and `llmd uninstall`: llmd as a systemd service in one command.

The files the service needs (the unit, the sysusers.d and tmpfiles.d snippets, the starting
llmd.toml) ship in `units/`; the repository's `systemd/` is a link to that folder. The steps
go through systemd's own tools (systemd-sysusers, systemd-tmpfiles, systemctl), whose `--root`
options let the same steps fill an image or a test tree instead of the running system.
"""
