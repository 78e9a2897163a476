"""A SearchService whose query encoder is slow, for tests of `rdscale serve`'s search page and request limits.

Served through the supported `service=` hook of rdscale.cluster.serve.start (a SearchService subclass named by
import path); its settings come from the replica's environment (Ray's runtime_env env_vars):

- RDSCALE_TEST_EMBED_DELAY: seconds each embedding step (EMBED_CHUNK sequences) sleeps before it embeds;
- RDSCALE_TEST_EMBED_LOG: a file that gets one line per embedding step started, so a test sees whether a
  request still computes after its client left.
"""

from __future__ import annotations

import os
import time

from rdscale.search.service import SearchService


class SlowSearchService(SearchService):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        delay = float(os.environ.get("RDSCALE_TEST_EMBED_DELAY", "0"))
        log = os.environ.get("RDSCALE_TEST_EMBED_LOG")
        for searcher in self.searchers.values():
            embedder = searcher.embedder()
            real = embedder.embed

            def slow(sequences, names=None, width=None, _real=real):
                if log:
                    with open(log, "a") as f:
                        f.write(f"{len(sequences)}\n")
                time.sleep(delay)
                return _real(sequences, names, width=width)

            embedder.embed = slow
