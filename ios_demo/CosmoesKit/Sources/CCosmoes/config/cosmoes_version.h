/* cosmoes_version.h: COSMOES_VERSION as a string literal, made from the bare version token Package.swift defines
 * (COSMOES_VERSION_TOKEN, e.g. 0.3.0, a valid preprocessing number), so that no quote characters have to survive
 * Swift PM's and Xcode's handling of -D values. Force-included into the runtime's sources (-include). */
#ifndef COSMOES_VERSION_H
#define COSMOES_VERSION_H
#define COSMOES_STRINGIFY_(x) #x
#define COSMOES_STRINGIFY(x) COSMOES_STRINGIFY_(x)
#ifdef COSMOES_VERSION_TOKEN
#define COSMOES_VERSION COSMOES_STRINGIFY(COSMOES_VERSION_TOKEN)
#endif
#endif
