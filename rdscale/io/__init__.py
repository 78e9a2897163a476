"""Input and output: streaming FASTA shards (`fasta`) and the run's Lance tables (`store`)."""
