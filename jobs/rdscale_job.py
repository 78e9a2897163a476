"""Entry point for `ray job submit`: runs one rdscale verb inside the cluster's driver.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/rdscale_job.py run -c demo --models $PWD/models/tiny/*.pt -o /shared/runs/demo

It is the CLI itself, with `ray.address=auto` forced so the job joins the cluster it was submitted to instead of
starting a private one. The job is resumable: submitting it again after a failure skips committed shards.

Paths: `--working-dir .` uploads the repository without its git-ignored folders (models/, runs/) into a temporary
folder on the cluster, and the config's relative paths resolve inside that upload. So checkpoints and the output
directory must be absolute paths on storage every node sees (given on the submitting shell, `$PWD/...` expands
there), or hub names (`650M`), which every node downloads into its own torch.hub cache. This script refuses an
output directory inside the upload (Ray deletes it) and names a checkpoint that did not travel, in one line each.
"""

import os
import sys
from pathlib import Path

from rdscale.cli.main import main


def _in_upload(path: str, upload: Path) -> bool:
    try:
        Path(path).resolve().relative_to(upload)
        return True
    except ValueError:
        return False


def check_paths(argv: list[str]) -> str | None:
    """One line saying why the job cannot work as submitted, or None."""
    from rdscale.cli.main import _load, build_parser
    from rdscale.config import ConfigError

    upload = Path.cwd().resolve()
    if "runtime_resources" not in upload.parts:  # not running from a `--working-dir` upload
        return None
    try:
        args = build_parser().parse_args(argv)
        if not hasattr(args, "config"):  # a verb without a run config (extend, info, ...)
            return None
        cfg = _load(args)
    except (ConfigError, SystemExit):
        return None  # the CLI reports it
    if "://" not in cfg.output.dir and _in_upload(cfg.output.dir, upload):
        return (f"output.dir {cfg.output.dir} is inside the job's uploaded working directory, which Ray deletes "
                "after the job: pass an absolute path that every node sees, e.g. -o /shared/runs/demo")
    lost = [m for m in cfg.models if os.sep in m and _in_upload(m, upload) and not Path(m).exists()]
    if lost:
        return (f"checkpoint {lost[0]} was not uploaded (--working-dir skips git-ignored folders such as models/): "
                "pass absolute checkpoint paths on a disk every node sees, e.g. --models $PWD/models/tiny/*.pt")
    return None


if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("ray.address=") for a in argv):
        argv += ["--set", "ray.address=auto"]
    problem = check_paths(argv)
    if problem:
        print(f"rdscale job: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(argv))
