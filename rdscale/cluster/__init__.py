"""Everything that talks to Ray lives here, and nowhere else: the Ray Data executor of the pipeline (`executor`), the
query server on Ray Serve (`serve`), sharded search and index builds over Ray tasks (`search`, `index`), and the
routing of Ray's own log lines (`progress`). Stages it runs are plain Python in `rdscale.run`; importing `rdscale`
never imports Ray."""
