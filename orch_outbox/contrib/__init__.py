"""Integrations with frameworks: each imports the core, which never imports them."""
