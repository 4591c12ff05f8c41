"""The Workload API's wire messages: py-spiffe's generated classes, imported in one place.

The SPIFFE Workload API messages have no proto package (``X509SVIDRequest``, not
``spiffe.X509SVIDRequest``), and the default protobuf descriptor pool cannot hold two definitions
of the same package-less name: a second ``workload.proto`` of ours would clash with py-spiffe's
the moment both are imported in one process. py-spiffe's generated module is also the canonical
wire schema every Python SPIFFE client speaks, so the server uses exactly those classes. Every
other module imports them from here, so a change of py-spiffe's private module path is a
one-line fix.
"""

from __future__ import annotations

from google.protobuf import struct_pb2
from spiffe._proto import workload_pb2

JWTBundlesRequest = workload_pb2.JWTBundlesRequest
JWTBundlesResponse = workload_pb2.JWTBundlesResponse
JWTSVID = workload_pb2.JWTSVID
JWTSVIDRequest = workload_pb2.JWTSVIDRequest
JWTSVIDResponse = workload_pb2.JWTSVIDResponse
ValidateJWTSVIDRequest = workload_pb2.ValidateJWTSVIDRequest
ValidateJWTSVIDResponse = workload_pb2.ValidateJWTSVIDResponse
X509BundlesRequest = workload_pb2.X509BundlesRequest
X509BundlesResponse = workload_pb2.X509BundlesResponse
X509SVID = workload_pb2.X509SVID
X509SVIDRequest = workload_pb2.X509SVIDRequest
X509SVIDResponse = workload_pb2.X509SVIDResponse
Struct = struct_pb2.Struct

__all__ = [
    "JWTSVID",
    "X509SVID",
    "JWTBundlesRequest",
    "JWTBundlesResponse",
    "JWTSVIDRequest",
    "JWTSVIDResponse",
    "Struct",
    "ValidateJWTSVIDRequest",
    "ValidateJWTSVIDResponse",
    "X509BundlesRequest",
    "X509BundlesResponse",
    "X509SVIDRequest",
    "X509SVIDResponse",
]
