"""DALL-E (Model Plugin) for Ango Hub: the shared layer (domain, ports, adapters)."""
