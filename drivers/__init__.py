"""Engine drivers: one module per engine, found through the `llmd.drivers` entry point group."""
