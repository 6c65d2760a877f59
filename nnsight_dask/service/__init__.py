"""Operating a deployment: the dashboard preload (``nnsight_dask.service.dashboard``)."""
