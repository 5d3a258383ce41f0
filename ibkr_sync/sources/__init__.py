"""The sources a sync reads from: each turns a broker's own report into the
source-neutral records of `ibkr_sync.snapshot`. `tws`: a running TWS / IB Gateway."""
