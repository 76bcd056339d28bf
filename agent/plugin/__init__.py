"""DynamICCL's NCCL tuner plugin: its C source, how it is built, and what it reports.

`dynamiccl_tuner.c` documents the plugin and its switch protocol; `build`
compiles it into the user's cache; `report` reads which configuration ran;
`driver` calls it from Python as NCCL would. The rules file it follows is
written by `rules`; `online` publishes a tuning round's rules inside a running job.
"""
