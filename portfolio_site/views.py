"""The site's own pages: only its front page, which is the admin."""

from django.http import HttpRequest, HttpResponseRedirect
from django.shortcuts import redirect

from ibkr_sync.admin.portfolio import may_open_overview


def home(request: HttpRequest) -> HttpResponseRedirect:
    """`/`, and the admin's "View site" link: the portfolio overview for those who may see
    it, the admin's index (or its login page) for everyone else."""
    if may_open_overview(request.user):
        return redirect("admin:portfolio_overview")
    return redirect("admin:index")
