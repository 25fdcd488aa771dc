"""The temporary Prefect server's process (`flows.server.TemporaryPrefect`): Prefect's API app under
uvicorn, as `python -m uvicorn` runs it, with the same arguments. Only the start differs: the cyclic
garbage collector is off while the app's modules are imported (~400k objects: the collections
that importing them triggers cost ~1 s of a 2-core machine that the command line is using too),
and the imported objects are then frozen out of later collections (`tasks.procs`)."""
from __future__ import annotations

import sys

if __name__ == "__main__":
    from selfalign.tasks.procs import freeze_imports, pause_gc

    pause_gc()
    import prefect.server.api.server  # noqa: F401  (the app factory's module: the heavy imports)
    import uvicorn.main

    freeze_imports()
    sys.exit(uvicorn.main.main())
