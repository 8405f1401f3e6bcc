"""The xDS wire: a delta ADS client that decodes resources and tracks versions."""
