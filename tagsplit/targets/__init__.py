"""Stage 4 of the pipeline: where a plan is written. One module per backend, all behind `base.Target`.

`file` (a patched copy of the .sys), `pykd` (resident memory from inside WinDbg/KD), `script` (a WinDbg command
script, rendered rather than executed) and `emu` (the emulated kernel used by tests and the demo).
Modules are imported by whoever needs them; `pykd` is only ever imported inside `tagsplit.targets.pykd`.
"""
