"""Benchmarks: one harness (`harness`) behind ``bench speed`` (`speed`), Table 1 (`efficiency`) and Figure 3
(`scaling`); their figures (`plots`); the host cost of a small step (`host`), encoder throughput (`encoder`)
and tissue detection (`tissue`)."""
