"""The quickstart task: corpus, gold scorer, backbone pretraining and the simulated annotator."""
