"""The model bundle: the unit of deployment and audit.

`bundle` reads, verifies, writes and exports bundle directories; `schema` holds the typed
feature schema, encoder config and policy the manifest describes. Imports only
uwrt.runtime.{config, errors, pb}: every stage may depend on it, it depends on no stage.
"""
