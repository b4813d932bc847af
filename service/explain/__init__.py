"""The explain pipeline: a picture in, predictions, heatmaps and pictures out, through the core's
served models. Arrays and pictures only; the fronts turn its results into messages."""
