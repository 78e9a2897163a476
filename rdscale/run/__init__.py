"""Running the pipeline: stages as plain Python (`stages`), the driver (`pipeline`) and growing a run to a larger
model (`extend`). The Ray executor that runs these stages on a cluster is `rdscale.cluster.executor`."""
