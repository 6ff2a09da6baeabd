// libcosmoes_jni: the JNI shim under org.cosmoes.Native, one function per cosmoes.h call; failures become
// org.cosmoes.CosmoesException(cosmoes_last_error(), status).
//
// Strings cross as UTF-8 bytes both ways (byte[] in, new String(bytes, UTF_8) out): JNI's own string functions speak
// modified UTF-8, which writes a character outside the BMP (an emoji in a prompt or a generated piece) as two
// surrogates, so they are not used for text. No C++ exception leaves a JNI function, and no JNI call is made while a
// Java exception is pending except the ones JNI allows (deleting references, returning).
#include <jni.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cosmoes/cosmoes.h"

namespace {

cosmoes_session* session_of(jlong handle) {
  return reinterpret_cast<cosmoes_session*>(static_cast<intptr_t>(handle));
}

// Looked up once when the library loads (from the class loader that loaded org.cosmoes.Native), not per token.
struct Refs {
  jclass string_class = nullptr;
  jmethodID string_init = nullptr;  // String(byte[], String charsetName)
  jstring utf8 = nullptr;           // "UTF-8"
  jclass error_class = nullptr;
  jmethodID error_init = nullptr;   // CosmoesException(String, int)
} refs;

// A java.lang.String from UTF-8 bytes (invalid sequences become U+FFFD, as Java decodes them); nullptr with an
// exception pending if the JVM could not allocate it.
jstring utf8_string(JNIEnv* env, const char* text) {
  const jsize n = static_cast<jsize>(std::strlen(text));
  jbyteArray bytes = env->NewByteArray(n);
  if (!bytes) return nullptr;
  env->SetByteArrayRegion(bytes, 0, n, reinterpret_cast<const jbyte*>(text));
  auto out = static_cast<jstring>(env->NewObject(refs.string_class, refs.string_init, bytes, refs.utf8));
  env->DeleteLocalRef(bytes);
  return out;
}

// Throws CosmoesException(message, status) unless another exception is already on its way.
void throw_cosmoes(JNIEnv* env, const char* message, int status) {
  if (env->ExceptionCheck()) return;
  jstring text = utf8_string(env, message);
  if (!text) return;  // OutOfMemoryError pending
  jobject error = env->NewObject(refs.error_class, refs.error_init, text, static_cast<jint>(status));
  if (error) env->Throw(static_cast<jthrowable>(error));
  env->DeleteLocalRef(text);
}

void throw_last_error(JNIEnv* env, int status) { throw_cosmoes(env, cosmoes_last_error(), status); }

jclass global_class(JNIEnv* env, const char* name) {
  jclass local = env->FindClass(name);
  if (!local) return nullptr;
  auto global = static_cast<jclass>(env->NewGlobalRef(local));
  env->DeleteLocalRef(local);
  return global;
}

// A byte[] as a NUL-terminated string; false (with an exception thrown) for null or an embedded NUL, which C would
// silently cut the text at.
bool utf8_arg(JNIEnv* env, jbyteArray bytes, const char* name, std::string& out) {
  const char* problem = !bytes ? " is null" : nullptr;
  if (bytes) {
    const jsize n = env->GetArrayLength(bytes);
    out.assign(static_cast<size_t>(n), '\0');
    env->GetByteArrayRegion(bytes, 0, n, reinterpret_cast<jbyte*>(&out[0]));
    if (out.find('\0') != std::string::npos) problem = " contains a NUL character";
  }
  if (problem) throw_cosmoes(env, (std::string(name) + problem).c_str(), COSMOES_INVALID_ARGUMENT);
  return !problem;
}

// What the token callback needs: the JNI env of the generating thread (the callback runs on it) and the Kotlin
// TokenCallback. After a Java exception the callback stops the generation and leaves the exception pending.
struct Callback {
  JNIEnv* env;
  jobject target;
  jmethodID on_token;
};

int on_token(const char* piece, int32_t id, void* user) {
  auto* cb = static_cast<Callback*>(user);
  JNIEnv* env = cb->env;
  if (env->ExceptionCheck()) return 1;
  jstring text = utf8_string(env, piece);
  if (!text) return 1;
  const jboolean stop = env->CallBooleanMethod(cb->target, cb->on_token, text, static_cast<jint>(id));
  env->DeleteLocalRef(text);
  return env->ExceptionCheck() || stop ? 1 : 0;
}

}  // namespace

extern "C" {

// Resolves the classes and methods the shim calls; a failure makes System.load throw instead of a later crash.
JNIEXPORT jint JNICALL JNI_OnLoad(JavaVM* vm, void*) {
  JNIEnv* env = nullptr;
  if (vm->GetEnv(reinterpret_cast<void**>(&env), JNI_VERSION_1_6) != JNI_OK) return JNI_ERR;
  refs.string_class = global_class(env, "java/lang/String");
  refs.error_class = refs.string_class ? global_class(env, "org/cosmoes/CosmoesException") : nullptr;
  if (!refs.error_class) return JNI_ERR;
  refs.string_init = env->GetMethodID(refs.string_class, "<init>", "([BLjava/lang/String;)V");
  refs.error_init = refs.string_init ? env->GetMethodID(refs.error_class, "<init>", "(Ljava/lang/String;I)V") : nullptr;
  jstring utf8 = refs.error_init ? env->NewStringUTF("UTF-8") : nullptr;  // ASCII: modified UTF-8 is UTF-8 here
  refs.utf8 = utf8 ? static_cast<jstring>(env->NewGlobalRef(utf8)) : nullptr;
  return refs.utf8 ? JNI_VERSION_1_6 : JNI_ERR;
}

JNIEXPORT jlong JNICALL Java_org_cosmoes_Native_open(JNIEnv* env, jobject, jbyteArray bundle_dir, jbyteArray options) {
  std::string dir, opts;
  if (!utf8_arg(env, bundle_dir, "bundleDir", dir) || !utf8_arg(env, options, "options", opts)) return 0;
  cosmoes_session* s = cosmoes_open(dir.c_str(), opts.c_str());
  if (!s) {
    throw_cosmoes(env, cosmoes_last_error(), cosmoes_last_status());  // NULL carries no status: ask for it
    return 0;
  }
  return static_cast<jlong>(reinterpret_cast<intptr_t>(s));
}

JNIEXPORT void JNICALL Java_org_cosmoes_Native_generate(JNIEnv* env, jobject, jlong handle, jbyteArray prompt,
                                                        jbyteArray params, jobject callback) {
  std::string text, json;
  if (!utf8_arg(env, prompt, "prompt", text) || !utf8_arg(env, params, "params", json)) return;
  jclass cls = env->GetObjectClass(callback);
  Callback cb{env, callback, env->GetMethodID(cls, "onToken", "(Ljava/lang/String;I)Z")};
  env->DeleteLocalRef(cls);
  if (!cb.on_token) return;  // NoSuchMethodError pending
  const int status = cosmoes_generate(session_of(handle), text.c_str(), json.c_str(), on_token, &cb);
  if (status != COSMOES_OK) throw_last_error(env, status);  // a pending callback exception wins
}

JNIEXPORT jintArray JNICALL Java_org_cosmoes_Native_generateIds(JNIEnv* env, jobject, jlong handle,
                                                                jintArray prompt_ids, jbyteArray params,
                                                                jint max_new_tokens) {
  std::string json;
  if (!utf8_arg(env, params, "params", json)) return nullptr;
  if (!prompt_ids) return throw_cosmoes(env, "promptIds is null", COSMOES_INVALID_ARGUMENT), nullptr;
  std::vector<int32_t> ids(static_cast<size_t>(env->GetArrayLength(prompt_ids)));
  if (!ids.empty())
    env->GetIntArrayRegion(prompt_ids, 0, static_cast<jsize>(ids.size()), reinterpret_cast<jint*>(ids.data()));
  std::vector<int32_t> out(static_cast<size_t>(max_new_tokens > 0 ? max_new_tokens : 0));
  size_t n = 0;
  const int status = cosmoes_generate_ids(session_of(handle), ids.data(), ids.size(), json.c_str(), out.data(),
                                          out.size(), &n);
  if (status != COSMOES_OK) return throw_last_error(env, status), nullptr;
  jintArray result = env->NewIntArray(static_cast<jsize>(n));
  if (result && n) env->SetIntArrayRegion(result, 0, static_cast<jsize>(n), reinterpret_cast<const jint*>(out.data()));
  return result;
}

JNIEXPORT jstring JNICALL Java_org_cosmoes_Native_statsJson(JNIEnv* env, jobject, jlong handle) {
  char* json = cosmoes_stats_json(session_of(handle));
  if (!json) return throw_last_error(env, COSMOES_INVALID_ARGUMENT), nullptr;
  jstring out = utf8_string(env, json);
  cosmoes_free(json);
  return out;
}

JNIEXPORT void JNICALL Java_org_cosmoes_Native_reset(JNIEnv*, jobject, jlong handle) {
  cosmoes_reset(session_of(handle));
}

JNIEXPORT void JNICALL Java_org_cosmoes_Native_close(JNIEnv*, jobject, jlong handle) {
  cosmoes_close(session_of(handle));
}

JNIEXPORT jstring JNICALL Java_org_cosmoes_Native_lastError(JNIEnv* env, jobject) {
  return utf8_string(env, cosmoes_last_error());
}

JNIEXPORT jstring JNICALL Java_org_cosmoes_Native_version(JNIEnv* env, jobject) {
  return utf8_string(env, cosmoes_version());
}

}  // extern "C"
