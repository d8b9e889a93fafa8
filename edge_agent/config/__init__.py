"""The config's shared field rules (fields.py): a leaf that every config section imports,
wherever the section lives (edge_agent/agent/config.py, edge_agent/publish/opcua_config.py)."""
