//! The GGUF reader (tandem-text, which links no kernels) sizes tensor data itself to check
//! it lies inside the file: for every GGML type id, its sizes (and its error for
//! rows that are not whole blocks) must be the kernels' own.

use tandem_kernels::GgmlType;
use tandem_text::gguf::tensor_byte_size;

#[test]
fn the_reader_sizes_exactly_the_types_the_kernels_compute_with() {
    for id in 0..64u32 {
        let kernels = GgmlType::from_id(id);
        assert_eq!(tensor_byte_size(id, 1, 1).is_some(), kernels.is_some(), "type id {id}");
        let Some(t) = kernels else { continue };
        for (n_elements, row_len) in [(32u64, 32u64), (4096, 64), (3 * 256, 256), (7, 7), (48, 48), (64, 33)] {
            let want = t.byte_size(n_elements, row_len);
            let got = tensor_byte_size(id, n_elements, row_len).unwrap();
            assert_eq!(got, want, "{} with {n_elements} elements in rows of {row_len}", t.name());
        }
    }
}
