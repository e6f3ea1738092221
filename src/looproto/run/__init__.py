"""The application layer: run configs, the `looproto` command, progress, the launcher.

* `config.py` -- TOML run configs (`load`, `RunConfig`) and the factories they name;
* `cli.py` -- `looproto train | evaluate | inspect` (`main`), also `python -m looproto`;
* `progress.py` -- the progress bar and log lines of `looproto train`;
* `launch.py` -- the local launcher behind `--num-processes`.

The library's core (`looproto.Controller`, the runners, checkpoints, backends) never
imports this package: it drives the core, as a user's own script would.
"""
