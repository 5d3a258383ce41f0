from rest_framework.permissions import BasePermission


class CanViewModel(BasePermission):
    """Reading a model's rows needs its Django `view` permission (`app.view_model`).

    The same permission shows the rows in the admin, so one grant (to a user or a group)
    covers both.
    """

    def has_permission(self, request, view) -> bool:
        model = view.get_queryset().model
        perm = f"{model._meta.app_label}.view_{model._meta.model_name}"
        self.message = f"You do not have permission to read these rows ({perm})."
        return request.user.has_perm(perm)
