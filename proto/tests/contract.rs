//! The shape of the contract, read from the embedded descriptor set: which services
//! and rpcs exist, which stream, and that every element carries a comment.

use std::collections::BTreeSet;

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};

fn tandem_files() -> Vec<FileDescriptorProto> {
    let fds = FileDescriptorSet::decode(tandem_proto::FILE_DESCRIPTOR_SET).unwrap();
    fds.file.into_iter().filter(|f| f.package().starts_with("tandem.")).collect()
}

fn file(package: &str) -> FileDescriptorProto {
    tandem_files().into_iter().find(|f| f.package() == package).unwrap_or_else(|| panic!("no {package}"))
}

/// (rpc name, server streaming) of the one service in `package`.
fn rpcs(package: &str) -> (String, Vec<(String, bool)>) {
    let f = file(package);
    assert_eq!(f.service.len(), 1, "{package} has one service");
    let svc = &f.service[0];
    for m in &svc.method {
        assert!(!m.client_streaming(), "{} streams from the client", m.name());
    }
    (svc.name().to_string(), svc.method.iter().map(|m| (m.name().to_string(), m.server_streaming())).collect())
}

#[test]
fn public_api_rpcs() {
    let (name, got) = rpcs("tandem.v1");
    assert_eq!(name, "Generate");
    let want = [("Generate", false), ("GenerateStream", true), ("Tokenize", false), ("ListModels", false)];
    assert_eq!(got, want.map(|(n, s)| (n.to_string(), s)));
}

#[test]
fn worker_api_rpcs() {
    let (name, got) = rpcs("tandem.worker.v1");
    assert_eq!(name, "Worker");
    let want = [
        ("Reserve", false),
        ("Prefill", false),
        ("Decode", true),
        ("Cancel", false),
        ("Stats", false),
        ("KvEvents", true),
        ("Drain", true),
        ("SetRole", false),
        ("Migrate", false),
    ];
    assert_eq!(got, want.map(|(n, s)| (n.to_string(), s)));
}

// Field numbers of descriptor.proto, used in `SourceCodeInfo` paths.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_ONEOF: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

/// Every service, rpc, message, field, oneof, enum and enum value has a leading
/// comment (STYLE: "`///` on every rpc and field"); the build keeps them in the
/// descriptor set, so reflection clients see them too.
#[test]
fn every_element_is_documented() {
    let mut undocumented = Vec::new();
    for f in tandem_files() {
        let info = f.source_code_info.as_ref().expect("descriptor set keeps source info");
        let documented: BTreeSet<Vec<i32>> =
            info.location.iter().filter(|l| !l.leading_comments().trim().is_empty()).map(|l| l.path.clone()).collect();
        let mut check = |path: Vec<i32>, what: String| {
            if !documented.contains(&path) {
                undocumented.push(format!("{}: {what}", f.name()));
            }
        };
        for (i, m) in f.message_type.iter().enumerate() {
            let base = vec![FILE_MESSAGE, i as i32];
            check(base.clone(), format!("message {}", m.name()));
            for (j, field) in m.field.iter().enumerate() {
                check([&base[..], &[MESSAGE_FIELD, j as i32]].concat(), format!("field {}.{}", m.name(), field.name()));
            }
            for (j, oneof) in m.oneof_decl.iter().enumerate() {
                // proto3 `optional` fields are synthetic oneofs named `_field`; they have no source.
                if !oneof.name().starts_with('_') {
                    check(
                        [&base[..], &[MESSAGE_ONEOF, j as i32]].concat(),
                        format!("oneof {}.{}", m.name(), oneof.name()),
                    );
                }
            }
        }
        for (i, e) in f.enum_type.iter().enumerate() {
            let base = vec![FILE_ENUM, i as i32];
            check(base.clone(), format!("enum {}", e.name()));
            for (j, v) in e.value.iter().enumerate() {
                check([&base[..], &[ENUM_VALUE, j as i32]].concat(), format!("enum value {}", v.name()));
            }
        }
        for (i, s) in f.service.iter().enumerate() {
            let base = vec![FILE_SERVICE, i as i32];
            check(base.clone(), format!("service {}", s.name()));
            for (j, m) in s.method.iter().enumerate() {
                check([&base[..], &[SERVICE_METHOD, j as i32]].concat(), format!("rpc {}.{}", s.name(), m.name()));
            }
        }
    }
    assert!(undocumented.is_empty(), "undocumented:\n{}", undocumented.join("\n"));
}

/// Enums follow the protobuf style guide: the zero value is `<ENUM>_UNSPECIFIED`,
/// and every value is prefixed with the enum's name, so packages can grow enums safely.
#[test]
fn enums_have_unspecified_zero_and_prefixed_values() {
    for f in tandem_files() {
        for e in &f.enum_type {
            let prefix: String = e
                .name()
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
                    sep.into_iter().chain(std::iter::once(c.to_ascii_uppercase()))
                })
                .collect();
            assert_eq!(e.value[0].number(), 0);
            assert_eq!(e.value[0].name(), format!("{prefix}_UNSPECIFIED"));
            for v in &e.value {
                assert!(v.name().starts_with(&format!("{prefix}_")), "{}", v.name());
            }
        }
    }
}
