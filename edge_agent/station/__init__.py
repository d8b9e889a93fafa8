"""The station: what a plant deploys around the model.

An **inspection** is camera x region (ROI in frame pixels) x ignore mask x bundle x
thresholds; a **recipe** is the inspections of one product, with the number a PLC sends; a
**part** is the results of every inspection of the recipe for one part id, assembled into one
verdict (worst wins; an inspection that does not answer in time is ERROR, named).

This package owns those rules and nothing else: no sockets, no threads, no model. The service
(edge_agent/agent/) runs the inspections and hands their results here; the protocol adapters
(edge_agent/publish/) render what comes out.
"""
