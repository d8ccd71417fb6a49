"""Model monitoring: the development sample's statistics a bundle carries (`monitoring.json`) and
the population stability index (PSI) of live or offline traffic against them (`drift`).

May import the foundation, the bundle and the policy (scores); never the pipeline, the serving
layer, the CLI, uwrt.demo or uwrt.bench. The server (runtime/serving/observe.py) and `uwrt drift`
(runtime/cli) use it; the demo trainer and `uwrt bundle create` write its statistics.
"""
