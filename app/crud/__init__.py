"""The service's database operations, a module per job: ``errors`` (what the routes turn into 4xx
answers), ``writes`` (the group-commit write path of predictions and their images),
``predictions`` (reading, filtering and labelling them), ``live_ab`` (the live A/B statistics) and
``runs`` (the registry of training runs and which one is served)."""
