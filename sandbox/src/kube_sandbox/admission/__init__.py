"""ValidatingAdmissionPolicy enforcement: CEL policies and bindings that admit, warn, audit or refuse.

``admissionregistration.k8s.io/v1`` ValidatingAdmissionPolicies and their bindings are stored
objects like any other; :class:`Admission` reads them from the store on every write request and
evaluates them with a real CEL implementation (cel-python), after defaulting and validation and
before anything is stored, as kube-apiserver's validating admission does:

* :mod:`.cel`: the expression language (the only user of ``celpy``);
* :mod:`.policies`: parsing, defaulting and validating the two kinds;
* :mod:`.matching`: the request :class:`Attributes` and ``matchResources`` rules;
* :mod:`.dispatcher`: evaluation, validation actions, the error and the audit log.

Request handlers build the :class:`Attributes` (who asks, for what) and pass the store
:func:`run`'s hook, called with ``(object, oldObject)``: the new object and the stored one, both
null where kube-apiserver's are (no ``oldObject`` on create, no ``object`` on delete), and for the
``scale`` subresource the ``autoscaling/v1`` Scale of each, as kube-apiserver converts them.
"""

from kube_sandbox.admission.dispatcher import (
    VALIDATION_FAILURE_ANNOTATION,
    Admission,
    AuditLog,
    Review,
    run,
)
from kube_sandbox.admission.matching import Attributes

__all__ = ["VALIDATION_FAILURE_ANNOTATION", "Admission", "Attributes", "AuditLog", "Review", "run"]
