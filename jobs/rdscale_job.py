"""Entry point for `ray job submit`: runs one rdscale verb inside the cluster's driver.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/rdscale_job.py run -c uniref50_cluster

It is the CLI itself, with `ray.address=auto` forced so the job joins the cluster it was submitted to instead of
starting a private one. The job is resumable: submitting it again after a failure skips committed shards.
"""

import sys

from rdscale.cli.main import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("ray.address=") for a in argv):
        argv += ["--set", "ray.address=auto"]
    sys.exit(main(argv))
