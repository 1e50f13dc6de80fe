//! Raw proxy-wasm reads that never panic. The SDK's getters panic on any status they don't
//! expect (and on bytes that are not UTF-8), and Envoy answers BadArgument or NotFound where a
//! map or buffer does not exist (a callout that failed before its headers, for one). A panic
//! traps the VM, so these reads return None instead and the caller decides what that means.

use std::ptr::null_mut;

/// proxy-wasm's header map types (the ABI's numbers).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum HeaderMap {
    Request = 0,
    Response = 2,
    CalloutResponse = 6,
}

/// proxy-wasm's buffer types (the ABI's numbers).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum BufferType {
    HttpResponseBody = 1,
    CalloutResponseBody = 4,
    PluginConfiguration = 7,
}

const STATUS_OK: u32 = 0;
const STATUS_NOT_FOUND: u32 = 1;
/// Bounds one drain of a queue, so that a host that never says Empty cannot hold the root forever.
const MAX_DEQUEUES: usize = 4096;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_status(
        return_code: *mut u32,
        return_message_data: *mut *mut u8,
        return_message_size: *mut usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

/// Takes ownership of memory the host allocated through the SDK's `proxy_on_memory_allocate`
/// (a `Vec<u8>` of exactly `size` capacity, leaked).
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        // SAFETY: the host wrote `size` bytes into a buffer the SDK's allocator leaked with
        // capacity `size`; nothing else owns it.
        Vec::from_raw_parts(data, size, size)
    }
}

/// A whole header map in the host's serialization (parse it with `headers::parse_map`), or None
/// when the host has no such map now.
pub fn header_map(map: HeaderMap) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the host writes a pointer and a size into the two out-parameters.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    // SAFETY: on success the host handed over ownership of `data`.
    let bytes = unsafe { take(data, size) };
    (status == STATUS_OK).then_some(bytes)
}

/// The first value of one header, as bytes: None when the host has no such map now, Some(None)
/// when the map has no such header. Cheaper than the whole map when a header or two is all that
/// is wanted: the host copies one value.
pub fn header_value(map: HeaderMap, name: &str) -> Option<Option<Vec<u8>>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in `header_map`; `name` outlives the call.
    let status = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    // SAFETY: as in `header_map`.
    let bytes = unsafe { take(data, size) };
    match status {
        STATUS_OK => Some(Some(bytes)),
        STATUS_NOT_FOUND => Some(None),
        _ => None,
    }
}

/// Up to `max_size` bytes of a buffer from `start`, or None when there is none.
pub fn buffer(buffer: BufferType, start: usize, max_size: usize) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in `header_map`.
    let status =
        unsafe { proxy_get_buffer_bytes(buffer as u32, start, max_size, &mut data, &mut size) };
    // SAFETY: as in `header_map`.
    let bytes = unsafe { take(data, size) };
    (status == STATUS_OK).then_some(bytes)
}

/// A host property (path segments joined by NUL, as the ABI wants), or None.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let mut serialized = Vec::new();
    for segment in path {
        serialized.extend_from_slice(segment.as_bytes());
        serialized.push(0);
    }
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in `header_map`; `serialized` outlives the call.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    // SAFETY: as in `header_map`.
    let bytes = unsafe { take(data, size) };
    (status == STATUS_OK).then_some(bytes)
}

/// The status of the last host call that reports one (a callout's failure, in its answer's
/// callback): the code and the message, read as bytes. The SDK's getter panics on a message that
/// is not UTF-8.
pub fn call_status() -> Option<(u32, String)> {
    let (mut code, mut data, mut size) = (0u32, null_mut(), 0usize);
    // SAFETY: the host writes a code, a pointer and a size into the out-parameters.
    let status = unsafe { proxy_get_status(&mut code, &mut data, &mut size) };
    // SAFETY: as in `header_map`.
    let bytes = unsafe { take(data, size) };
    (status == STATUS_OK).then(|| (code, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Empties a shared queue; returns how many items it held. Items may be empty (the doorbell's are:
/// an empty item costs the host no call back into the VM to allocate): Envoy hands an empty item
/// over as Ok with no data, which the SDK's `dequeue_shared_queue` can't tell from an empty queue,
/// so the status is read here.
pub fn drain_queue(queue_id: u32) -> usize {
    let mut items = 0;
    while items < MAX_DEQUEUES {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: as in `header_map`.
        let status = unsafe { proxy_dequeue_shared_queue(queue_id, &mut data, &mut size) };
        // SAFETY: as in `header_map`.
        drop(unsafe { take(data, size) });
        if status != STATUS_OK {
            break;
        }
        items += 1;
    }
    items
}
