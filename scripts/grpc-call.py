#!/usr/bin/env python3
"""A generic gRPC command-line client in the style of grpcurl.

It knows no .proto file: it asks the server through gRPC server reflection
(`grpc.reflection.v1`, falling back to `grpc.reflection.v1alpha`) for the files
that define a symbol and every file they import, builds the message classes in a
private descriptor pool, turns a JSON request into the request message and prints
each response message as one line of JSON (proto field names).

TLS, as grpcurl's flags: --cacert (the CA that signed the server), --cert and --key
(a client certificate, for servers that require one, as Tandem's workers do with
mutual TLS) and --servername (the name to check the server's certificate against,
when the address is not it). What it does not do: client-streaming or bidirectional
methods, .proto files given on the command line.

Needs grpcio, grpcio-reflection and protobuf: scripts/setup-python-clients.sh puts
them in <repo>/.venv-clients, which this script re-executes itself with when they
are not importable.
"""

import argparse
import base64
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import grpc
    from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha import reflection_pb2
except ImportError:
    _VENV = Path(__file__).resolve().parent.parent / ".venv-clients"
    if (_VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != _VENV.resolve():
        _PYTHON = str(_VENV / "bin" / "python")
        os.execv(_PYTHON, [_PYTHON, __file__, *sys.argv[1:]])
    sys.exit("grpc-call: grpcio, grpcio-reflection and protobuf are not installed: "
             "run scripts/setup-python-clients.sh")

EXAMPLES = """\
examples:
  %(prog)s 127.0.0.1:50051 list
  %(prog)s 127.0.0.1:50051 list tandem.v1.Generate
  %(prog)s 127.0.0.1:50051 describe tandem.v1.Generate
  %(prog)s 127.0.0.1:50051 describe tandem.v1.GenerateRequest
  %(prog)s -d '{"prompt":"hi","sampling":{"max_tokens":3}}' 127.0.0.1:50051 tandem.v1.Generate/GenerateStream
  echo '{}' | %(prog)s -d @ --timeout 5 -H 'x-request-id: 42' 127.0.0.1:50051 tandem.v1.Generate/ListModels
  %(prog)s --cacert ca.crt --cert router.crt --key router.key --servername tandem-worker \
      10.0.0.7:50061 tandem.worker.v1.Worker/Stats

output:
  list: one service (or, with SERVICE, one fully qualified method) per line.
  describe: the symbol rebuilt as .proto text, with the comments the server sent.
  a call: each response message as one compact JSON object per line, with the
  .proto field names; enums by name; 64-bit integers as strings (proto3 JSON).

exit status:
  0 success; 1 an RPC failed (ERROR: <status code>: <details> on stderr) or the
  request or symbol was bad; 2 bad command line; 130 interrupted.
"""

# The two reflection services. Their messages are field-for-field identical, so the
# v1alpha classes that grpcio-reflection ships also (de)serialize v1.
REFLECTION_METHODS = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)

# Files that the protobuf package itself ships, used when the server does not send them.
WELL_KNOWN_MODULES = (
    "any_pb2", "api_pb2", "descriptor_pb2", "duration_pb2", "empty_pb2", "field_mask_pb2",
    "source_context_pb2", "struct_pb2", "timestamp_pb2", "type_pb2", "wrappers_pb2",
)

STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

# FileDescriptorProto paths (field numbers) used to find source comments.
MESSAGE_TYPE, ENUM_TYPE, SERVICE = 4, 5, 6                   # in FileDescriptorProto
FIELD, NESTED_TYPE, NESTED_ENUM = 2, 3, 4                    # in DescriptorProto
ENUM_VALUE, METHOD = 2, 2                                    # in Enum/ServiceDescriptorProto


class Failure(Exception):
    """Ends the program with `ERROR: <message>` on stderr and exit status 1."""


def rpc_failure(error: grpc.RpcError) -> Failure:
    return Failure(f"{error.code().name}: {error.details()}")


class Deadline:
    """One deadline for the whole command (reflection look-ups and the call), or none."""

    def __init__(self, seconds: float | None):
        self._end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())


class Reflection:
    """Asks a server's reflection service, v1 first, v1alpha when v1 is UNIMPLEMENTED."""

    def __init__(self, channel: grpc.Channel, metadata: list, deadline: Deadline):
        self._metadata = metadata
        self._deadline = deadline
        self._methods = [
            channel.stream_stream(
                path,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            for path in REFLECTION_METHODS
        ]

    def _ask(self, **request) -> reflection_pb2.ServerReflectionResponse:
        message = reflection_pb2.ServerReflectionRequest(**request)
        while True:
            try:
                responses = list(self._methods[0](
                    iter([message]), metadata=self._metadata, timeout=self._deadline.remaining()))
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise rpc_failure(error) from None
                if len(self._methods) == 1:
                    raise Failure("UNIMPLEMENTED: the server does not support reflection "
                                  "(neither grpc.reflection.v1 nor v1alpha)") from None
                self._methods.pop(0)
        if len(responses) != 1:
            raise Failure(f"reflection answered {len(responses)} messages to one request")
        response = responses[0]
        if response.HasField("error_response"):
            error = response.error_response
            code = STATUS_NAMES.get(error.error_code, str(error.error_code))
            asked = message.WhichOneof("message_request")
            raise Failure(f"{code}: {error.error_message} (reflection {asked} "
                          f"{getattr(message, asked)!r})")
        return response

    def list_services(self) -> list[str]:
        response = self._ask(list_services="")
        return [service.name for service in response.list_services_response.service]

    def file_containing_symbol(self, symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
        return self._files(self._ask(file_containing_symbol=symbol))

    def file_by_filename(self, name: str) -> list[descriptor_pb2.FileDescriptorProto]:
        return self._files(self._ask(file_by_filename=name))

    @staticmethod
    def _files(response) -> list[descriptor_pb2.FileDescriptorProto]:
        return [descriptor_pb2.FileDescriptorProto.FromString(raw)
                for raw in response.file_descriptor_response.file_descriptor_proto]


def well_known_file(name: str) -> descriptor_pb2.FileDescriptorProto | None:
    """`google/protobuf/<x>.proto` as the installed protobuf package has it, if it has it."""
    if not name.startswith("google/protobuf/"):
        return None
    import importlib
    for module in WELL_KNOWN_MODULES:
        importlib.import_module(f"google.protobuf.{module}")
    try:
        found = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        return None
    proto = descriptor_pb2.FileDescriptorProto()
    found.CopyToProto(proto)
    return proto


@dataclass
class Element:
    """A named thing in a .proto file, with the file and source path that locate its comments."""

    kind: str  # "service", "method", "message" or "enum"
    proto: object  # its *DescriptorProto
    file: descriptor_pb2.FileDescriptorProto
    path: tuple[int, ...]


class Schema:
    """The files learnt through reflection: a private descriptor pool and the protos it holds."""

    def __init__(self, reflection: Reflection):
        self.pool = descriptor_pool.DescriptorPool()
        self._reflection = reflection
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}  # in the pool
        self._received: dict[str, descriptor_pb2.FileDescriptorProto] = {}  # sent, maybe not added
        self._elements: dict[str, Element] | None = None

    def load_symbol(self, symbol: str) -> None:
        """Adds the file defining `symbol` (and every file it imports) to the pool."""
        for proto in self._reflection.file_containing_symbol(symbol):
            self._received.setdefault(proto.name, proto)
            self._add(proto.name, ())

    def _add(self, name: str, importers: tuple[str, ...]) -> None:
        if name in self._files:
            return
        if name in importers:
            raise Failure(f"import cycle: {' -> '.join(importers + (name,))}")
        proto = self._received.get(name) or well_known_file(name) or self._fetch(name)
        for dependency in proto.dependency:
            self._add(dependency, importers + (name,))
        self.pool.AddSerializedFile(proto.SerializeToString())
        self._files[name] = proto
        self._elements = None

    def _fetch(self, name: str) -> descriptor_pb2.FileDescriptorProto:
        for proto in self._reflection.file_by_filename(name):
            self._received.setdefault(proto.name, proto)
        if name not in self._received:
            raise Failure(f"NOT_FOUND: the server did not send {name}")
        return self._received[name]

    def find(self, symbol: str) -> Element:
        """The service, method, message or enum named `symbol`, loading its file if needed.

        Some servers (grpcio-reflection's) find no file for a method or a nested type:
        then the file of the enclosing scope is asked for instead.
        """
        if self._elements is None:
            self._elements = index_elements(self._files.values())
        scope, first_failure = symbol, None
        while symbol not in self._elements and scope:
            try:
                self.load_symbol(scope)
                self._elements = index_elements(self._files.values())
                break
            except Failure as failure:
                if not str(failure).startswith("NOT_FOUND"):
                    raise
                first_failure = first_failure or failure
                scope = scope.rpartition(".")[0]
        if symbol not in self._elements:
            raise first_failure or Failure(
                f"NOT_FOUND: no service, method, message or enum named {symbol}")
        return self._elements[symbol]


def index_elements(files) -> dict[str, Element]:
    elements: dict[str, Element] = {}

    def add_enum(prefix, enum, file, path):
        elements[prefix + enum.name] = Element("enum", enum, file, path)

    def add_message(prefix, message, file, path):
        name = prefix + message.name
        elements[name] = Element("message", message, file, path)
        for i, nested in enumerate(message.nested_type):
            add_message(name + ".", nested, file, path + (NESTED_TYPE, i))
        for i, enum in enumerate(message.enum_type):
            add_enum(name + ".", enum, file, path + (NESTED_ENUM, i))

    for file in files:
        prefix = file.package + "." if file.package else ""
        for i, message in enumerate(file.message_type):
            add_message(prefix, message, file, (MESSAGE_TYPE, i))
        for i, enum in enumerate(file.enum_type):
            add_enum(prefix, enum, file, (ENUM_TYPE, i))
        for i, service in enumerate(file.service):
            name = prefix + service.name
            elements[name] = Element("service", service, file, (SERVICE, i))
            for j, method in enumerate(service.method):
                elements[f"{name}.{method.name}"] = Element(
                    "method", method, file, (SERVICE, i, METHOD, j))
    return elements


# --- describe: an element rebuilt as .proto text ----------------------------------


class ProtoWriter:
    """Renders elements of one file as .proto text, with their leading comments."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto):
        self._file = file
        self._comments = {tuple(location.path): location.leading_comments
                          for location in file.source_code_info.location
                          if location.leading_comments}
        self.lines: list[str] = []

    def _comment(self, path, indent):
        text = self._comments.get(tuple(path))
        if text:
            self.lines.extend(f"{indent}//{line}" for line in text.rstrip("\n").split("\n"))

    def element(self, element: Element) -> None:
        render = {"service": self.service, "method": self.method,
                  "message": self.message, "enum": self.enum}[element.kind]
        render(element.proto, element.path, "")

    def service(self, service, path, indent):
        self._comment(path, indent)
        self.lines.append(f"{indent}service {service.name} {{")
        for i, method in enumerate(service.method):
            self.method(method, path + (METHOD, i), indent + "  ")
        self.lines.append(f"{indent}}}")

    def method(self, method, path, indent):
        self._comment(path, indent)
        request = ("stream " if method.client_streaming else "") + method.input_type
        response = ("stream " if method.server_streaming else "") + method.output_type
        self.lines.append(f"{indent}rpc {method.name} ( {request} ) returns ( {response} );")

    def enum(self, enum, path, indent):
        self._comment(path, indent)
        self.lines.append(f"{indent}enum {enum.name} {{")
        for i, value in enumerate(enum.value):
            self._comment(path + (ENUM_VALUE, i), indent + "  ")
            self.lines.append(f"{indent}  {value.name} = {value.number};")
        self.lines.append(f"{indent}}}")

    def message(self, message, path, indent):
        maps = {entry.name: entry for entry in message.nested_type if entry.options.map_entry}
        self._comment(path, indent)
        self.lines.append(f"{indent}message {message.name} {{")
        inner = indent + "  "
        done_oneofs = set()
        for i, field in enumerate(message.field):
            in_oneof = field.HasField("oneof_index") and not field.proto3_optional
            if not in_oneof:
                self._field(message, field, maps, path + (FIELD, i), inner)
                continue
            if field.oneof_index in done_oneofs:
                continue
            # A real oneof: print all its fields together, where its first field is.
            done_oneofs.add(field.oneof_index)
            self.lines.append(f"{inner}oneof {message.oneof_decl[field.oneof_index].name} {{")
            for j, member in enumerate(message.field):
                if member.HasField("oneof_index") and member.oneof_index == field.oneof_index:
                    self._field(message, member, maps, path + (FIELD, j), inner + "  ", label=False)
            self.lines.append(f"{inner}}}")
        for i, enum in enumerate(message.enum_type):
            self.enum(enum, path + (NESTED_ENUM, i), inner)
        for i, nested in enumerate(message.nested_type):
            if nested.name not in maps:
                self.message(nested, path + (NESTED_TYPE, i), inner)
        self.lines.append(f"{indent}}}")

    def _field(self, message, field, maps, path, indent, label=True):
        self._comment(path, indent)
        entry = maps.get(field.type_name.rsplit(".", 1)[-1]) if field.type_name else None
        if entry is not None and field.label == field.LABEL_REPEATED:
            key, value = entry.field[0], entry.field[1]
            kind = f"map<{type_name(key)}, {type_name(value)}>"
        else:
            kind = type_name(field)
            if label:
                kind = self._label(field) + kind
        self.lines.append(f"{indent}{kind} {field.name} = {field.number};")

    def _label(self, field) -> str:
        if field.label == field.LABEL_REPEATED:
            return "repeated "
        if field.label == field.LABEL_REQUIRED:
            return "required "
        if field.proto3_optional or self._file.syntax in ("", "proto2"):
            return "optional "
        return ""


def type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type_name:
        return field.type_name
    # TYPE_UINT32 -> uint32
    return descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)[len("TYPE_"):].lower()


# --- the commands ------------------------------------------------------------------


def command_list(reflection: Reflection, schema: Schema, service: str | None) -> None:
    if service is None:
        for name in sorted(reflection.list_services()):
            print(name)
        return
    element = schema.find(service)
    if element.kind != "service":
        raise Failure(f"{service} is a {element.kind}, not a service")
    for method in element.proto.method:
        print(f"{service}.{method.name}")


def command_describe(reflection: Reflection, schema: Schema, symbol: str | None) -> None:
    symbols = [symbol] if symbol is not None else sorted(reflection.list_services())
    for i, name in enumerate(symbols):
        element = schema.find(name)
        writer = ProtoWriter(element.file)
        writer.element(element)
        if i:
            print()
        article = "an" if element.kind == "enum" else "a"
        print(f"{name} is {article} {element.kind}:")
        print("\n".join(writer.lines))


def command_call(channel, schema: Schema, target: str, data: str | None, metadata,
                 deadline: Deadline, emit_defaults: bool) -> None:
    service_name, _, method_name = target.replace("/", ".").rpartition(".")
    if not service_name:
        raise Failure(f"{target}: expected SERVICE/METHOD, e.g. tandem.v1.Generate/Generate")
    if schema.find(service_name).kind != "service":
        raise Failure(f"{service_name} is not a service")
    service = schema.pool.FindServiceByName(service_name)
    method = service.methods_by_name.get(method_name)
    if method is None:
        raise Failure(f"NOT_FOUND: service {service_name} has no method {method_name}")
    if method.client_streaming:
        raise Failure(f"{target} is client-streaming; only unary and server-streaming "
                      "methods are supported")

    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    if data == "@":
        data = sys.stdin.read()
    request = request_class()
    try:
        json_format.Parse(data if data and data.strip() else "{}", request,
                          descriptor_pool=schema.pool)
    except json_format.ParseError as error:
        raise Failure(f"request is not a valid {method.input_type.full_name}: {error}") from None

    path = f"/{service_name}/{method_name}"
    options = {"request_serializer": request_class.SerializeToString,
               "response_deserializer": response_class.FromString}
    json_options = {"preserving_proto_field_name": True, "descriptor_pool": schema.pool}
    if emit_defaults:
        json_options["always_print_fields_with_no_presence"] = True

    def show(response) -> None:
        text = json.dumps(json_format.MessageToDict(response, **json_options),
                          ensure_ascii=False, separators=(",", ":"))
        print(text, flush=True)

    if not method.server_streaming:
        try:
            show(channel.unary_unary(path, **options)(
                request, metadata=metadata, timeout=deadline.remaining()))
        except grpc.RpcError as error:
            raise rpc_failure(error) from None
        return
    responses = channel.unary_stream(path, **options)(
        request, metadata=metadata, timeout=deadline.remaining())
    try:
        for response in responses:
            show(response)
    except grpc.RpcError as error:
        raise rpc_failure(error) from None
    finally:
        responses.cancel()  # a no-op once the stream has ended; stops it on Ctrl-C


def parse_header(text: str) -> tuple[str, str | bytes]:
    key, sep, value = text.partition(":")
    key, value = key.strip().lower(), value.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected 'key: value', got {text!r}")
    if key.endswith("-bin"):  # binary metadata, given in base64 as grpcurl takes it
        try:
            return key, base64.b64decode(value, validate=True)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}: value is not base64") from None
    return key, value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]),
        usage="%(prog)s [options] ADDR (list [SERVICE] | describe [SYMBOL] | SERVICE/METHOD)",
        description="Call a gRPC server, grpcurl style, learning its services and message "
                    "types through server reflection (no .proto files needed). Plaintext "
                    "unless a TLS flag is given.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--data", metavar="JSON",
                        help="the request as JSON (proto or JSON field names); '@' reads it "
                             "from stdin; absent: an empty request message")
    parser.add_argument("-H", "--header", metavar="'KEY: VALUE'", action="append", default=[],
                        type=parse_header,
                        help="request metadata, repeatable; sent with reflection requests "
                             "too; a KEY ending in -bin takes a base64 VALUE")
    parser.add_argument("--timeout", metavar="SECONDS", type=float,
                        help="deadline for the whole command, reflection included; "
                             "absent: none")
    parser.add_argument("--emit-defaults", action="store_true",
                        help="also print fields that hold their default value")
    parser.add_argument("--plaintext", action="store_true",
                        help="accepted for grpcurl command lines; plaintext is the default")
    parser.add_argument("--cacert", metavar="FILE",
                        help="TLS: the PEM CA certificate(s) the server's certificate must "
                             "chain to (absent with another TLS flag: the system's roots)")
    parser.add_argument("--cert", metavar="FILE",
                        help="TLS: this client's PEM certificate chain (with --key)")
    parser.add_argument("--key", metavar="FILE", help="TLS: this client's PEM private key")
    parser.add_argument("--servername", metavar="NAME",
                        help="TLS: the name the server's certificate must carry, when it "
                             "is not ADDR's host")
    parser.add_argument("address", metavar="ADDR", help="the server, host:port")
    parser.add_argument("command", metavar="COMMAND", nargs="+",
                        help="'list' lists services, 'list SERVICE' its methods; "
                             "'describe SYMBOL' prints a service, method, message or enum "
                             "(every service without SYMBOL); SERVICE/METHOD (or "
                             "SERVICE.METHOD) calls a unary or server-streaming method")
    args = parser.parse_intermixed_args(argv)

    verb, operands = args.command[0], args.command[1:]
    if verb in ("list", "describe"):
        if len(operands) > 1:
            parser.error(f"{verb} takes at most one symbol")
        if args.data is not None:
            parser.error(f"-d is for method calls, not {verb}")
    elif operands:
        parser.error(f"unexpected arguments after {verb}: {' '.join(operands)}")
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    if args.plaintext and (args.cacert or args.cert or args.servername):
        parser.error("--plaintext and TLS flags exclude each other")
    return args


def open_channel(args) -> grpc.Channel:
    """A plaintext channel, or a TLS one when any TLS flag is given."""
    if not (args.cacert or args.cert or args.servername):
        return grpc.insecure_channel(args.address)

    def read(path):
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise Failure(f"reading {path}: {e.strerror}") from None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.cacert), private_key=read(args.key),
        certificate_chain=read(args.cert))
    options = [("grpc.ssl_target_name_override", args.servername)] if args.servername else []
    return grpc.secure_channel(args.address, credentials, options)


def main(argv=None) -> int:
    args = parse_args(argv)
    verb, operands = args.command[0], args.command[1:]
    symbol = operands[0].lstrip(".").replace("/", ".") if operands else None
    deadline = Deadline(args.timeout)
    try:
        channel = open_channel(args)
    except Failure as failure:
        print(f"ERROR: {failure}", file=sys.stderr)
        return 1
    with channel:
        reflection = Reflection(channel, args.header, deadline)
        schema = Schema(reflection)
        try:
            if verb == "list":
                command_list(reflection, schema, symbol)
            elif verb == "describe":
                command_describe(reflection, schema, symbol)
            else:
                command_call(channel, schema, verb.lstrip("."), args.data, args.header,
                             deadline, args.emit_defaults)
        except Failure as failure:
            print(f"ERROR: {failure}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # e.g. `| head -n1`: stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
