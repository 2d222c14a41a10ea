"""Studies built on the core (data, models, objectives, training, evaluation); each registers its commands."""
