"""The paper's analysis: its hardware and model tables, the decoding-cost model, the AFD
roofline estimator and the deployment memory plan."""
