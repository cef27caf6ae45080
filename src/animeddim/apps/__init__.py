"""Programs built on the pipelines API: the guided tour, the bench, the web app."""
