#!/usr/bin/python3
"""A third-party client of the mesh CA: Python's grpcio and protobuf (Debian's python3-grpcio and
python3-protobuf), with Istio's CA messages (security/proto/istioca.proto in istio/api) built
from a descriptor at run time, so no generated code and no protoc.

usage: ca_client.py ADDRESS SERVER_NAME ROOTS_PEM TOKEN_FILE CSR_PEM VALIDITY_SECONDS

Prints one JSON object: {"code": <gRPC status number>, "details": "...", "chain": ["PEM", ...]}.
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

FIELD = descriptor_pb2.FieldDescriptorProto


def message_classes():
    fdp = descriptor_pb2.FileDescriptorProto(
        name="security/proto/istioca.proto",
        package="istio.v1.auth",
        dependency=["google/protobuf/struct.proto"],
        syntax="proto3",
    )
    req = fdp.message_type.add(name="IstioCertificateRequest")
    req.field.add(name="csr", number=1, type=FIELD.TYPE_STRING, label=FIELD.LABEL_OPTIONAL)
    req.field.add(name="validity_duration", number=3, type=FIELD.TYPE_INT64, label=FIELD.LABEL_OPTIONAL)
    req.field.add(name="metadata", number=4, type=FIELD.TYPE_MESSAGE,
                  type_name=".google.protobuf.Struct", label=FIELD.LABEL_OPTIONAL)
    resp = fdp.message_type.add(name="IstioCertificateResponse")
    resp.field.add(name="cert_chain", number=200, type=FIELD.TYPE_STRING, label=FIELD.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)

    def cls(name):
        desc = pool.FindMessageTypeByName(name)
        if hasattr(message_factory, "GetMessageClass"):
            return message_factory.GetMessageClass(desc)
        return message_factory.MessageFactory(pool).GetPrototype(desc)

    return cls("istio.v1.auth.IstioCertificateRequest"), cls("istio.v1.auth.IstioCertificateResponse")


def main():
    address, server_name, roots, token_file, csr_file, validity = sys.argv[1:7]
    Request, Response = message_classes()
    creds = grpc.ssl_channel_credentials(root_certificates=open(roots, "rb").read())
    channel = grpc.secure_channel(address, creds, options=[
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
    ])
    call = channel.unary_unary(
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    request = Request(csr=open(csr_file).read(), validity_duration=int(validity))
    # What ztunnel sends; the CA must skip it.
    request.metadata.fields["ImpersonatedIdentity"].string_value = "ignored"
    token = open(token_file).read().strip()
    try:
        response = call(request, metadata=[("authorization", "Bearer " + token)], timeout=20)
        out = {"code": 0, "details": "", "chain": list(response.cert_chain)}
    except grpc.RpcError as e:
        out = {"code": e.code().value[0], "details": e.details() or "", "chain": []}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
