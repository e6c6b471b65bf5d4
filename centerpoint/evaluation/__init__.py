"""From a model to numbers and pictures: peak decoding, prediction on a split or on image files,
COCOeval metrics, predict's output files, drawn boxes and TensorBoard evaluation pictures."""
