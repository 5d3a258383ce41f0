from rest_framework.permissions import BasePermission

from .. import permissions


class CanViewModel(BasePermission):
    """Reading a model's rows needs the view permission of the kind of data they are
    (`ibkr_sync.permissions`: the model's own `app.view_model` for all but a position
    change, which is a position's past).

    The admin decides by the same table, so one grant (to a user or a group) shows a kind
    of data in both, and its absence hides it from both.
    """

    def has_permission(self, request, view) -> bool:
        model = view.get_queryset().model
        perm = permissions.permission_for_rows(model)
        self.message = f"You do not have permission to read these rows ({perm})."
        return request.user.has_perm(perm)
