"""Running the services of a run together on one machine (`asyncgrpo up`)."""
