"""Operating a deployment: the dashboard's Experiments page (``service.dashboard``) and the CLI (``service.cli``)."""
