"""Example task modules (``celeriac demo`` runs ``celeriac.examples.demo``)."""
