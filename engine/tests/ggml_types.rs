//! The GGUF reader (tandem-text, which links no kernels) sizes tensor data itself to check
//! it lies inside the file: for every GGML type id, its sizes (and its error for
//! rows that are not whole blocks) must be the kernels' own. It also sizes a few types the
//! kernels refuse (Q2_K, Q3_K, BF16), so that the engine names them in its error.

use tandem_kernels::GgmlType;
use tandem_text::gguf::tensor_byte_size;

#[test]
fn the_reader_sizes_every_type_the_kernels_compute_with() {
    let refused_by_name = ["Q2_K", "Q3_K", "BF16"];
    for id in 0..64u32 {
        let kernels = GgmlType::from_id(id);
        let sized = tensor_byte_size(id, 1, 1).is_some();
        let refused = refused_by_name.contains(&GgmlType::name_of_id(id).as_str());
        assert_eq!(sized, kernels.is_some() || refused, "type id {id}");
        let Some(t) = kernels else { continue };
        for (n_elements, row_len) in [(32u64, 32u64), (4096, 64), (3 * 256, 256), (7, 7), (48, 48), (64, 33)] {
            let want = t.byte_size(n_elements, row_len);
            let got = tensor_byte_size(id, n_elements, row_len).unwrap();
            assert_eq!(got, want, "{} with {n_elements} elements in rows of {row_len}", t.name());
        }
    }
}
