"""Registry, configs, layouts, reduction results, the per-model handle and stats."""
