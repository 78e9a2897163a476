"""Everything that talks to Ray lives here, and nowhere else: the Ray Data executor of the pipeline (`executor`).
Stages it runs are plain Python in `rdscale.run`; importing `rdscale` never imports Ray."""
