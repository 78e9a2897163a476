"""`rdscale <verb>`: the command line. `main` holds the core verbs; each other module registers a verb group."""
