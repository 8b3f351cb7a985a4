"""Chargers: the OCPP 1.6J gateway (``gateway``), the web side's command client (``client``), simulated chargers (``simulator``) and their commands (``cli``)."""
