"""`mmgen serve`: a local story studio (page + JSON API) over one loaded model; see app.py."""
