"""The shop: orders, each confirmed by a command pushed in the order's own transaction."""
