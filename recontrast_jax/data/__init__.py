"""Dataset sources and tf.data input pipelines."""
