"""Billing: invoices, their artifacts and lifecycle.

`usage` reads the billing record (hourly usage rows) from the warehouse, `cycle` runs
the lifecycle (drafts, finalize, void), `store` keeps drafts, finals and the ledger,
`artifacts` renders each document's files, `focus_export` writes FOCUS files, and
`explain` traces a line to its rows and requests.
"""
