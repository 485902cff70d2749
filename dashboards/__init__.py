"""The browser dashboard over the published analytics catalog (not an installed package)."""
