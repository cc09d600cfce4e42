"""Named model shapes (`NAME.json`) that the exporter builds with seeded random weights; package
data, so an installed wheel has them.
"""
